"""`python -m sslcli` is the `ssl` command (also the entry point under torchrun)."""

from sslcli.cli.app import main

if __name__ == "__main__":
    main()
