"""Platform default policies (``<platform>.yaml``), shipped as package data."""
