"""oobleck.agent"""
