"""oobleck.cli"""
