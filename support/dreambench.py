"""DreamBench's prompts (DreamBooth, Ruiz et al. 2023: google/dreambooth, dataset/prompts_and_classes.txt, CC BY
4.0), the 25 for objects and the 25 for live subjects, with {token} {class} where the dataset writes its unique and
class tokens. eval.py samples them; DreamBooth's own evaluation picks the list by the subject: its live subjects are
its dogs and cats."""

# The live-subject list's outfits and hats suit anything alive: the dataset's live subjects (its 9 dogs and cats), and
# the other pets, animals and people users train on; any other class word gets the object list (--prompts chooses)
LIVE_CLASSES = ("dog", "cat", "puppy", "kitten", "person", "man", "woman", "boy", "girl", "child", "baby", "bird",
                "parrot", "horse", "rabbit", "bunny", "hamster", "guinea pig", "ferret", "fox", "bear", "monkey",
                "lion", "tiger", "cow", "pig", "sheep", "goat", "duck", "chicken", "owl", "turtle", "lizard", "fish")

# The two lists share their first ten prompts (scenes) and their last five (properties), in the dataset's order
SCENES = [
    'a {token} {class} in the jungle',
    'a {token} {class} in the snow',
    'a {token} {class} on the beach',
    'a {token} {class} on a cobblestone street',
    'a {token} {class} on top of pink fabric',
    'a {token} {class} on top of a wooden floor',
    'a {token} {class} with a city in the background',
    'a {token} {class} with a mountain in the background',
    'a {token} {class} with a blue house in the background',
    'a {token} {class} on top of a purple rug in a forest',
]
PROPERTIES = [
    'a red {token} {class}',
    'a purple {token} {class}',
    'a shiny {token} {class}',
    'a wet {token} {class}',
    'a cube shaped {token} {class}',
]
OBJECT_PROMPTS = SCENES + [
    'a {token} {class} with a wheat field in the background',
    'a {token} {class} with a tree and autumn leaves in the background',
    'a {token} {class} with the Eiffel Tower in the background',
    'a {token} {class} floating on top of water',
    'a {token} {class} floating in an ocean of milk',
    'a {token} {class} on top of green grass with sunflowers around it',
    'a {token} {class} on top of a mirror',
    'a {token} {class} on top of the sidewalk in a crowded street',
    'a {token} {class} on top of a dirt road',
    'a {token} {class} on top of a white rug',
] + PROPERTIES
LIVE_PROMPTS = SCENES + [
    'a {token} {class} wearing a red hat',
    'a {token} {class} wearing a santa hat',
    'a {token} {class} wearing a rainbow scarf',
    'a {token} {class} wearing a black top hat and a monocle',
    'a {token} {class} in a chef outfit',
    'a {token} {class} in a firefighter outfit',
    'a {token} {class} in a police outfit',
    'a {token} {class} wearing pink glasses',
    'a {token} {class} wearing a yellow shirt',
    'a {token} {class} in a purple wizard outfit',
] + PROPERTIES
