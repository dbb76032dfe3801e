"""Reading models written by other frameworks."""
