"""mcore.fusions"""
