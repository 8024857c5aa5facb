"""oobleck.worker"""
