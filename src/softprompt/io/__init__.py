"""Files on disk: crash-safe writes (`atomic`), the prompt folder's files (`prompt`) and its
model card (`model_card`). A prompt folder with its task head is `softprompt.folder`."""

from .atomic import (load_tensors, read_json_object, remove_stale_temporaries, write_directory_atomically,
                     write_file_atomically, write_json_atomically)
from .prompt import (CARD_FILE, CONFIG_FILE, HEAD_FILE, PROMPT_FILE, TASK_FILE, TRAINABLE_FILE, load_prompt,
                     read_config, save_prompt)

__all__ = ["CARD_FILE", "CONFIG_FILE", "HEAD_FILE", "PROMPT_FILE", "TASK_FILE", "TRAINABLE_FILE", "load_prompt",
           "load_tensors", "read_config", "read_json_object", "remove_stale_temporaries", "save_prompt",
           "write_directory_atomically", "write_file_atomically", "write_json_atomically"]
