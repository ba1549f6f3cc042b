"""sslcli.cli."""
