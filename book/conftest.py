"""pytest settings for the chapters (collected by `pytest --nbval`).

Progress bars are switched off in the kernels nbval starts: nbval reads a kernel's messages only
after each cell ends, and the thousands of widget updates a long training cell's tqdm bars send
overflow its queue, losing the message that says the cell is done. Nobody sees those bars anyway.
"""

import os

os.environ["TQDM_DISABLE"] = "1"
