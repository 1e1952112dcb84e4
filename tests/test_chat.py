import numpy as np
import pytest
import torch

from captum_mllm import AudioPart, Chat, TextPart, Turn
from captum_mllm.chat import as_chat
from captum_mllm.errors import (
    AudioError,
    EmptyChatError,
    EmptyTextError,
    InvalidContentError,
    InvalidRoleError,
)


def test_builder_is_immutable_and_ordered():
    base = Chat().system("Be brief.")
    chat = base.user("Hi there").assistant("Hello")
    assert len(base) == 1
    assert [t.role for t in chat] == ["system", "user", "assistant"]
    assert chat[1].text == "Hi there"


def test_messages_round_trip():
    chat = Chat().system("Be brief.").user(["Who", " are you?"])
    messages = chat.to_messages()
    assert messages[1]["content"] == [
        {"type": "text", "text": "Who"},
        {"type": "text", "text": " are you?"},
    ]
    back = Chat.from_messages(messages)
    assert [t.text for t in back] == [t.text for t in chat]
    assert Chat.from_messages([{"role": "user", "content": "Hi"}])[0].parts == (TextPart("Hi"),)


def test_message_keys_beside_role_and_content_reach_the_template():
    """reasoning_content, tool_calls, tool_call_id: chat templates render them
    (Qwen's the calls as JSON), and they vanished, with a warning at best."""
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},  # a call alone
        {"role": "tool", "content": "Sunny.", "tool_call_id": "0"},
    ]
    chat = Chat.from_messages(messages)
    assert [t.role for t in chat] == ["user", "assistant", "tool"]
    assert chat[1].parts == () and chat[1].extra == {"tool_calls": [call]}
    assert chat[2].extra == {"tool_call_id": "0"}
    assert [m.get("tool_calls") for m in chat.to_messages()] == [None, [call], None]
    built = Chat().user("Weather?").assistant(tool_calls=[call]).tool("Sunny.", tool_call_id="0")
    assert list(built) == list(chat)
    call["function"]["arguments"]["city"] = "Rome"  # the chat is immutable: its copy stays
    assert chat[1].extra["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert chat.split_response()[1] is None  # a tool's output: an answer is still to come
    with pytest.raises(InvalidContentError, match="holding tool_calls"):
        chat.assistant(tool_calls=[call]).split_response()  # the answer is text alone
    with pytest.raises(EmptyChatError):
        Chat().user("Hi").assistant()  # no text and no call
    with pytest.raises(InvalidContentError, match="beside role and content"):
        Turn("user", (TextPart("Hi"),), {"role": "system"})
    with pytest.raises(TypeError, match=r"\['sampling_rate'\]"):  # misspelt: not a message key
        Chat().user(audio=np.zeros(800), sampling_rate=16000)
    for calls in ("weather(Paris)", [["weather"]]):  # a template would loop over its letters
        with pytest.raises(InvalidContentError, match="tool_calls must be a list of dicts"):
            Chat().user("Hi").assistant(tool_calls=calls)


def test_an_openai_sdk_messages_unset_fields_are_left_out():
    """A message as the OpenAI SDK dumps it (refusal=None, annotations=[],
    audio=None, tool_calls=None): those keys warned that the template renders
    none of them, on every chat read from such a log."""
    dumped = {"role": "assistant", "content": "Paris.", "refusal": None, "annotations": [],
              "audio": None, "function_call": None, "tool_calls": None}  # fmt: skip
    chat = Chat.from_messages([{"role": "user", "content": "Capital of France?"}, dumped])
    assert chat[1].extra == {}
    kept = Chat.from_messages([{"role": "tool", "content": "Sunny.", "tool_call_id": "0"}])
    assert kept[0].extra == {"tool_call_id": "0"}


def test_audio_part_from_messages_keeps_rate_and_length():
    wave = np.zeros(1600, dtype=np.float32)
    chat = Chat.from_messages(
        [{"role": "user", "content": [{"type": "audio", "audio": wave, "sampling_rate": 16000}]}]
    )
    part = chat[0].parts[0]
    assert isinstance(part, AudioPart) and part.sample_rate == 16000
    assert part.duration == pytest.approx(0.1)
    assert chat.has_audio


def test_audio_items_of_a_hugging_face_datasets_column_are_read(tmp_path):
    """A datasets messages column fills each part's missing keys with None (an
    audio part by path gets "audio": None): it raised "an audio item needs one
    of 'audio', 'path', ...", as the first key present was taken."""
    import datasets
    import soundfile as sf

    sf.write(tmp_path / "q.wav", np.zeros(1600, dtype=np.float32), 16000)
    by_path = {"type": "audio", "path": str(tmp_path / "q.wav")}
    by_samples = {"type": "audio", "audio": [0.0] * 800, "sampling_rate": 16000}
    content = [{"type": "text", "text": "Listen:"}, by_path, by_samples]
    row = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": content}]}])[0]
    assert row["messages"][0]["content"][1]["audio"] is None  # what Arrow fills in
    parts = Chat.from_messages(row["messages"])[0].parts
    assert parts[0] == TextPart("Listen:")
    assert [p.duration for p in parts[1:]] == [0.1, 0.05]  # type: ignore[union-attr]


def test_openai_responses_api_text_items_are_read():
    """The Responses API's messages hold "input_text" and "output_text" items:
    they raised "unknown content type"."""
    chat = Chat.from_messages([
        {"role": "user", "content": [{"type": "input_text", "text": "Capital of France?"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Paris."}]},
    ])  # fmt: skip
    assert chat.to_messages() == Chat().user("Capital of France?").assistant("Paris.").to_messages()
    with pytest.raises(InvalidContentError, match="unknown content type 'image'"):
        Chat.from_messages([{"role": "user", "content": [{"type": "image", "url": "x.png"}]}])


def test_sharegpt_messages_are_read_and_a_row_is_not_read_as_messages():
    """ShareGPT's {"from", "value"} messages, common in Hugging Face data sets,
    were refused as having no role; a data set's row (a dict) or a str was
    iterated as if it held messages."""
    sharegpt = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                {"from": "gpt", "value": "Hello."}]  # fmt: skip
    expected = Chat().system("Be brief.").user("Hi?").assistant("Hello.")
    assert Chat.from_messages(sharegpt).to_messages() == expected.to_messages()
    with pytest.raises(InvalidContentError, match="unknown ShareGPT speaker 'bot'"):
        Chat.from_messages([{"from": "bot", "value": "x"}])
    with pytest.raises(InvalidContentError, match=r"mapping with keys \['conversations', 'id'\]"):
        Chat.from_messages({"id": 1, "conversations": sharegpt})  # type: ignore[arg-type]
    with pytest.raises(InvalidContentError, match="got a str"):
        Chat.from_messages("Hi?")  # type: ignore[arg-type]


def test_a_text_item_without_text_names_its_keys():
    # {"type": "text", "content": ...} said "text parts must be str, got NoneType"
    keys = r"needs a 'text' key; it has \['content', 'type'\]"
    with pytest.raises(InvalidContentError, match=keys):
        Chat.from_messages([{"role": "user", "content": [{"type": "text", "content": "Hi?"}]}])


def test_openai_input_audio_items_are_read():
    # {"type": "input_audio"} was accepted by name, but its base64 data was read as a path
    import base64
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(1600, dtype=np.float32), 16000, format="WAV")
    data = base64.b64encode(buf.getvalue()).decode()
    for item in ({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                 {"type": "input_audio", "data": data}):  # fmt: skip
        part = Chat.from_messages([{"role": "user", "content": [item]}])[0].parts[0]
        assert isinstance(part, AudioPart) and part.duration == pytest.approx(0.1)
    with pytest.raises(InvalidContentError, match="base64"):
        Chat.from_messages([{"role": "user", "content": [{"type": "input_audio", "data": "a b"}]}])


@pytest.mark.parametrize(
    "build, error",
    [
        (lambda: Chat().add("robot", "hi"), InvalidRoleError),
        (lambda: Chat().add("developer", "hi"), "use 'system'"),  # roles of other APIs: named
        (lambda: Chat.from_messages([{"role": "function", "content": "42"}]), "a 'tool' turn"),
        (lambda: as_chat(Chat()), EmptyChatError),
        (lambda: as_chat([]), EmptyChatError),
        (lambda: Chat().user("   "), EmptyTextError),
        (lambda: Chat().user(""), EmptyTextError),
        (lambda: TextPart(3), InvalidContentError),  # type: ignore[arg-type]
        (lambda: Turn("user", ()), EmptyChatError),
        (lambda: Chat.from_messages([{"role": "user", "content": 5}]), InvalidContentError),
        (
            lambda: Chat.from_messages([{"role": "user", "content": [{"type": "video"}]}]),
            InvalidContentError,
        ),
        (lambda: Chat.from_messages([{"content": "hi"}]), InvalidContentError),
        (lambda: Chat().user(audio=torch.zeros(10)), AudioError),  # no sample rate
    ],
)
def test_invalid_chats_raise_named_errors(build, error):
    if isinstance(error, str):  # an InvalidRoleError that says what to use instead
        with pytest.raises(InvalidRoleError, match=error):
            build()
        return
    with pytest.raises(error):
        build()


def test_text_of_the_wrong_type_names_the_problem():
    with pytest.raises(InvalidContentError, match="int"):
        Chat().user(123)  # type: ignore[arg-type]
    with pytest.raises(EmptyChatError):
        Chat().user()
    # a clip given as the text was told to go through str()
    clip = AudioPart.from_any(np.zeros(1600, dtype=np.float32), 16000)
    for audio_as_text in (clip, [clip, "What is said?"], clip.waveform.numpy()):
        with pytest.raises(InvalidContentError, match="audio goes in audio="):
            Chat().user(audio_as_text)  # type: ignore[arg-type]
    assert list(Chat().user(TextPart("Hi"))) == list(Chat().user("Hi"))


def test_an_empty_system_message_is_accepted_as_templates_accept_it():
    chat = Chat().system("").user("Hi")
    assert chat[0].text == ""
    assert Chat.from_messages([{"role": "system", "content": ""}])[0].text == ""
    with pytest.raises(EmptyTextError):
        Chat().user("")


def test_split_response_takes_a_final_assistant_text_turn():
    chat = Chat().system("Be brief.").user("Hi")
    assert chat.split_response() == (chat, None)
    prompt, answer = chat.assistant("Hello!").split_response()
    assert answer == "Hello!" and len(prompt) == 2
    with pytest.raises(EmptyChatError):
        Chat().assistant("Hello!").split_response()
