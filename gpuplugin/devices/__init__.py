"""What is done to a device tree before it is served: allocation policies, health policy, sharing, list
strategies, CDI and MPS.
"""
