"""The command line: serve, devices, demo, mock."""

import click


@click.group()
def main() -> None:
    """A Kubernetes device plugin for GPUs."""
