"""benchsync.daemon: the wiring — libp2p host, services, control API, CLI and config."""
