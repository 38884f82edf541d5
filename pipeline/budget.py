"""`python -m pipeline.budget probe`: the entry point that probe folders' Makefiles call (pipeline/deploy/probe.py)."""
import sys

from pipeline.deploy.probe import main

if __name__ == "__main__":
    sys.exit(main())
