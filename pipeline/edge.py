"""`python -m pipeline.edge`: what bundles' Makefiles and Dockerfile.jetson call (pipeline/deploy/edge.py)."""
import sys

from pipeline.deploy.edge import main

if __name__ == "__main__":
    sys.exit(main())
