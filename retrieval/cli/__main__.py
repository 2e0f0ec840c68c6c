import sys

from retrieval.cli.app import app

sys.exit(app())
