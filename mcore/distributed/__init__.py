"""mcore.distributed"""
