"""One file per model family; importing vitkit.registry.list_models() loads them."""
