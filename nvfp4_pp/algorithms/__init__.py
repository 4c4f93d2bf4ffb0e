"""How weights are fitted: the one table of recipes and algorithms (table.py), and next to it each
algorithm's module."""
