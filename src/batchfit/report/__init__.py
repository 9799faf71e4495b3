"""The HTML report: one self-contained file drawn from a Plan and its measurements."""
