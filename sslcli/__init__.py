"""sslcli: pretrain, evaluate and audit self-distillation vision models from the command line.

The library under the `ssl` command. Layout (imports point down only):
cli -> export / neighbors -> train | eval (siblings) -> methods / bootstrap -> models / losses / data
-> config / runfiles / device / errors.
"""

__version__ = "0.2.0.dev0"
