"""sslcli.train."""
