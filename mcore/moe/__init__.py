"""mcore.moe"""
