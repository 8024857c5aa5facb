"""oobleck.common"""
