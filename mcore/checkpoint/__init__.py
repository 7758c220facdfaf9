"""mcore.checkpoint"""
