"""Relais: a Squid-class proxy as a suite of mitmproxy addons.

The pipeline order and the flow.metadata contract are in addons/README.md;
the key names are constants in addons/meta.py.
"""
