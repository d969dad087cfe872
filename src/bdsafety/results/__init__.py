"""The results layer: everything between the stored stages and what a reader sees.

`assemble` builds results.json from a run's finished stages (typed rows and blocks: `schema`), `aggregate` the
seed summary, `card` the verdict card of each purified model (from the evidence each audit reports itself),
`table` the flat table of `bdsafety results`, and `thresholds` every threshold the card and the claims share.
Nothing here runs a model.
"""
