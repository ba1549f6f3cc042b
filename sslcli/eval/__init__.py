"""sslcli.eval."""
