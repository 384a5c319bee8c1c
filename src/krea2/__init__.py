"""krea2: an open implementation of the Krea 2 text-to-image system."""

__version__ = "0.1.0"
