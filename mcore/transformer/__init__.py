"""mcore.transformer"""
