"""The datastore service: a JupyterHub-managed Tornado service, the one enforcement point."""
