"""Scale-out engines: Ray (``fusionseg segment --engine ray``)."""
