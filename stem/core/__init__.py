"""What every layer may use: the errors users see (one line naming the problem and the fix) and atomic
writes of files and folders. Imports nothing else of stem."""
