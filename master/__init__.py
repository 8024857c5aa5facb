"""oobleck.master"""
