"""Admission: taking work in. Validation of submits, the quota and fair-share checks, the single and
pipelined group submit transactions, and the submit batcher that coalesces concurrent submits.
"""
