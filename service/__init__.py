"""The HTTP linking service. Imports no training code (tests/test_service.py checks it)."""
