"""Visual-token pruning methods, one file each (see ``base`` for the contract, ``operators.registry``
for the names)."""
