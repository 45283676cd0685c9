"""`python -m phi3flow.front_door`: the command users type to serve a model, where it has always
been. The server itself is phi3flow/serving/front_door.py."""

from phi3flow.serving.front_door import main

if __name__ == "__main__":
    main()
