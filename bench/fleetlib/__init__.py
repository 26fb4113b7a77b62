"""The boot-storm benchmark's parts (bench/fleet.py): trace, emulated network, servers, clients, storm, table."""
