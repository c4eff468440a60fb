"""The applications: each imports the model (jina_v4.model), which never imports them."""
