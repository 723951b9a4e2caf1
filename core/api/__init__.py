"""The REST API: views that parse a request, call one stage function, and render."""
