"""`optimum-cli dfq ...`: optimum_dfq's commands, contributed through optimum's PEP 420 register namespace.

This file must stay light: optimum-cli imports every register module to build its help.
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class DFQCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="dfq", help="Data-free low-bit quantization of ViT, DeiT and Swin (optimum_dfq).")

    @staticmethod
    def parse_args(parser):
        from optimum_dfq.cli import add_commands

        add_commands(parser)

    def run(self):
        import sys

        from optimum_dfq.cli import dispatch

        status = dispatch(self.args, self.parser)
        if status:
            sys.exit(status)


REGISTER_COMMANDS = [DFQCommand]
