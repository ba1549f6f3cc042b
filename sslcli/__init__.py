"""sslcli: pretrain, evaluate and audit self-distillation vision models from the command line.

The library under the `ssl` command. Layout (imports point down only):
cli -> train / export -> eval -> methods / bootstrap -> models / losses / data -> config / errors.
"""

__version__ = "0.1.0"
