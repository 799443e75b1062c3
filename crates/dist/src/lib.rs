//! Rendezvous, process groups (Gloo on CPU) and the torchrun-style launcher.
