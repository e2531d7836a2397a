"""`python -m vggjax COMMAND [flags]`: the same as the `vggjax` command (vggjax.cli.main)."""

from vggjax import cli

if __name__ == '__main__':
  cli.main()
