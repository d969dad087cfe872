"""bdsafety: backdoor attacks, purification defenses and superficial-safety audits for image classifiers."""

__version__ = "0.2.0"
