"""Tables, leaderboards and plots built from run folders."""
