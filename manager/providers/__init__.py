"""Where instances are rented. One file per provider, each a `Provider`; `REGISTRY` names them."""
