"""bdsafety: backdoor attacks, purification defenses and superficial-safety audits for image classifiers."""

__version__ = "0.1.0"
