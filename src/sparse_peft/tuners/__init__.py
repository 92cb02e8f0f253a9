"""The tuners sparse_peft adds to peft, one subpackage each (config / layer / model)."""
