"""Reconstruction: hop events into packets, and the verdict on each packet and on the flow."""
