"""Pure analysis functions (fits, emergence, grokking, quanta) and one CLI module per study."""
