"""Proxy drivers: the interface, the loader and the built-in nginx and HAProxy drivers."""

from meshctl.proxy.base import ProxyDriver, ProxyPaths, available_drivers, load_driver

__all__ = ["ProxyDriver", "ProxyPaths", "available_drivers", "load_driver"]
