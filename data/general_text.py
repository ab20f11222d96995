"""General text for the forgetting measure: short paragraphs on everyday and technical subjects.

Written for this project (Apache-2.0, like the rest of the repository). They are not instructions and
not about the instruction data's constraint kinds: the eval stage measures each model's perplexity on
them (`forgetting.ppl`) to see how much of its general language modelling a fine-tune kept.
data/build.py writes them to data/general/heldout.jsonl (one {"id", "text"} row each).
"""

PARAGRAPHS = [
    "The morning train was late again, so Maria walked the last two stops. The streets were still wet from the "
    "night's rain, and the bakery on the corner had just opened its doors. She bought a warm roll and ate it on "
    "the way, watching the city slowly wake up around her.",
    "Before you paint a wall, wash it with mild soap and let it dry completely. Fill any small holes with filler, "
    "sand the patches smooth, and cover the skirting boards with tape. Two thin coats of paint look better and "
    "last longer than one thick coat.",
    "In the early nineteenth century, most people never travelled more than a day's walk from the village where "
    "they were born. The arrival of the railway changed that within a single generation. Towns that had been "
    "days apart were suddenly a few hours away.",
    "The committee met on Tuesday to discuss the new budget. Several members argued that the library deserved "
    "more funding, while others wanted to repair the roads first. In the end, they agreed to split the extra "
    "money evenly and to review the decision next spring.",
    "Sound is a wave of pressure that travels through air, water or solid objects. Our ears turn these tiny "
    "changes in pressure into signals that the brain understands as music, speech or noise. Sound moves about "
    "four times faster in water than in air.",
    "My grandfather kept a small notebook in his shirt pocket for more than fifty years. He wrote down the "
    "weather, the price of bread, and the names of birds he saw in the garden. When we read it after he died, "
    "it felt like a quiet history of the whole town.",
    "A good cup of tea depends on fresh water, the right temperature and patience. Boiling water suits strong "
    "black tea, but delicate green tea prefers water that has cooled for a minute or two. Leaving the leaves too "
    "long makes the drink bitter.",
    "The city council has announced that the central square will be closed to cars on weekends. Shop owners are "
    "divided: some expect more visitors on foot, while others worry that customers will stay away. A trial will "
    "run for six months before a final decision is made.",
    "When learning a new language, short daily practice works better than long weekly sessions. Reading simple "
    "stories, listening to songs and speaking with patient friends all help. Mistakes are part of the process, "
    "and most people are happy to help a learner.",
    "The old lighthouse keeper's cottage is now a small museum. Visitors can climb the narrow stairs, look at the "
    "brass instruments, and read letters written by the families who lived there. On stormy days, the wind "
    "still howls through the gaps in the windows.",
    "Plate tectonics explains why continents slowly drift across the surface of the Earth. The outer shell of the "
    "planet is broken into large pieces that float on hotter, softer rock below. Where the pieces meet, we find "
    "mountains, trenches and volcanoes.",
    "Dear Sam, thank you for the lovely book you sent for my birthday. I started reading it on the bus and almost "
    "missed my stop. The weather here has been cold but bright, and the garden is full of early flowers. I hope "
    "to visit you in the summer.",
    "To make a simple tomato sauce, soften a chopped onion in olive oil over a low heat. Add garlic, a tin of "
    "tomatoes and a pinch of salt, then let it simmer for twenty minutes. A few fresh basil leaves at the end "
    "make it taste of summer.",
    "Software rarely fails because of one big mistake. More often, several small assumptions turn out to be wrong "
    "at the same time. Careful logging, simple designs and honest reviews make these problems easier to find "
    "before they reach users.",
    "The market was crowded with people buying fruit, fish and flowers. Sellers called out their prices, children "
    "ran between the stalls, and an old man played the accordion near the fountain. By noon, most of the best "
    "peaches had already been sold.",
    "Sleep is not simply rest for the body. While we sleep, the brain sorts through the day's experiences, "
    "strengthens useful memories and clears away waste. People who sleep poorly for long periods often find it "
    "harder to concentrate and to control their mood.",
    "The bridge was finished in the spring of 1932 after four years of work. Hundreds of people gathered on the "
    "riverbanks to watch the first car cross. Local newspapers described it as the most important day in the "
    "town's history.",
    "If your bicycle chain keeps slipping, the cause is often a worn chain or cassette. Clean the chain, check "
    "it with a simple gauge, and replace it if it has stretched. Riding with a worn chain wears out the more "
    "expensive parts much faster.",
    "Economists often disagree about the best way to reduce unemployment. Some favour public spending on roads "
    "and schools, while others believe that lower taxes encourage businesses to hire. Most agree that education "
    "and training matter in the long run.",
    "The fox appeared at the edge of the field just as the sun was setting. It paused, lifted its nose to the "
    "wind, and then trotted along the hedge without a sound. A moment later it was gone, and only the crows "
    "were left arguing in the trees.",
    "A budget is simply a plan for how to use money. Writing down what comes in and what goes out each month "
    "shows where savings are possible. Many people are surprised by how much they spend on small daily "
    "purchases.",
    "The first printed maps of the coast were full of errors. Sailors corrected them by hand, adding rocks, "
    "currents and safe harbours they had discovered. Over centuries, these notes turned rough sketches into the "
    "accurate charts we rely on today.",
    "Our team spent the afternoon testing the new version of the app. Most features worked well, but the search "
    "page was slow on older phones. We decided to delay the release by a week to fix the problem properly.",
    "Light from distant stars can take thousands of years to reach us. When we look at the night sky, we are "
    "seeing the stars as they were long ago, not as they are now. Some of them may no longer exist at all.",
    "The recipe called for three eggs, but there were only two in the fridge. Anna added a spoonful of yoghurt "
    "instead, hoping for the best. The cake rose a little less than usual, but everyone agreed it tasted just as "
    "good.",
    "Good meetings have a clear purpose, a short agenda and a fixed end time. Someone should write down what was "
    "decided and who will do what next. Without these simple habits, meetings easily turn into long "
    "conversations that change nothing.",
    "The village school has only forty pupils, but it has won several regional science prizes. Teachers say the "
    "secret is letting children ask their own questions and design simple experiments. Parents often join in "
    "on open days.",
    "Water expands when it freezes, which is unusual among liquids. This is why ice floats and why pipes can "
    "burst in winter. If ice sank, lakes would freeze from the bottom up, and many fish could not survive the "
    "cold months.",
    "On the last day of the holiday, we climbed the hill behind the campsite one more time. The view stretched "
    "across the valley to the distant sea. Nobody said much; we just sat on the warm rocks and tried to remember "
    "every detail.",
    "A strong argument starts with a clear claim and supports it with evidence. It also considers the best "
    "objections and explains why they do not change the conclusion. Insulting the other side may feel "
    "satisfying, but it rarely persuades anyone.",
    "The storm knocked out power across the northern district for most of the night. Emergency crews worked "
    "until dawn to clear fallen trees and repair damaged lines. By morning, most homes had electricity again, "
    "although some roads remained closed.",
    "Most houseflies live for only a few weeks, yet they can lay hundreds of eggs in that time. Their eyes are "
    "made of thousands of tiny lenses, which helps them notice movement very quickly. That is why they are so "
    "hard to swat.",
    "When writing an email to a stranger, keep it short and explain in the first line why you are writing. Be "
    "polite, be specific about what you need, and thank the reader for their time. A clear message is far more "
    "likely to get a reply.",
    "In medieval towns, most houses were built of wood and thatch, so fire was a constant danger. Many cities "
    "passed laws requiring stone walls between buildings. Night watchmen walked the streets, ready to raise the "
    "alarm at the first sign of smoke.",
    "The orchestra tuned their instruments while the audience found their seats. Then the hall went quiet, the "
    "conductor raised her hands, and the first soft notes of the violins filled the room. For the next hour, "
    "nobody moved.",
    "Interest rates affect almost everyone, even people who never borrow money. When rates rise, loans become "
    "more expensive and savings earn a little more. When they fall, buying a house or starting a business "
    "becomes easier.",
    "Tom had never planted anything before, so he started with a single pot of herbs on his windowsill. Within "
    "a month, the basil was taller than his coffee mug. By the end of the summer, his small balcony was full of "
    "tomatoes and beans.",
    "Scientists test ideas by making predictions that could turn out to be wrong. If careful experiments keep "
    "agreeing with a theory, confidence in it grows. A single well-checked result that disagrees can be enough "
    "to change the theory.",
    "The museum's new exhibition tells the story of everyday life in the city a century ago. There are old "
    "shop signs, school desks, kitchen tools and photographs of crowded streets. Many visitors recognise objects "
    "their grandparents used.",
    "Before a long drive, check the tyres, the oil and the water for the windscreen. Plan a break every two hours "
    "to stretch your legs and rest your eyes. Tired drivers react more slowly, even when they feel fine.",
    "The river rose quickly after three days of heavy rain. Farmers moved their animals to higher ground, and "
    "volunteers filled sandbags outside the church. By Sunday the water had begun to fall, leaving thick mud "
    "across the lower fields.",
    "Most of the energy we use comes, one way or another, from the sun. Plants capture sunlight and store it as "
    "chemical energy, and ancient plants became the coal, oil and gas we burn today. Wind is also driven by the "
    "sun heating the air unevenly.",
    "Learning to play an instrument as an adult is slower but still very rewarding. Adults often understand "
    "music theory more quickly than children, even if their fingers take longer to follow. Regular short "
    "practice is the key.",
    "The hotel stood at the end of a narrow road lined with pine trees. Its rooms were simple but clean, and "
    "every window looked out over the lake. In the evenings, guests gathered by the fire to share stories about "
    "their walks.",
    "A library card is one of the best bargains available. It gives free access to books, newspapers, films and "
    "often online courses. Librarians can also help you find reliable information on almost any subject.",
    "Early computers filled entire rooms and needed teams of people to operate them. They were slower than a "
    "modern pocket calculator, yet they helped solve problems that had taken months to work out by hand. Their "
    "descendants now fit in our pockets.",
    "The negotiations lasted late into the night. Both sides wanted an agreement, but neither wanted to appear "
    "weak. Shortly after midnight, they announced a compromise that gave each side part of what it had asked "
    "for.",
    "Children learn to speak by listening, copying and experimenting with sounds. Long before they can form "
    "sentences, they understand the rhythm and tone of the language around them. Talking and reading with "
    "young children makes a real difference.",
    "The path through the forest was soft with fallen needles. Sunlight came through the branches in narrow "
    "beams, and somewhere a woodpecker was knocking on a tree. We walked for an hour without meeting another "
    "person.",
    "Many arguments online go wrong because people answer what they think was said rather than what was "
    "actually written. Reading slowly, asking questions and assuming good intentions can turn a fight into a "
    "useful conversation.",
    "Salt has been valuable throughout history. It preserved food before refrigerators existed, and some armies "
    "were paid partly in salt. Towns near salt mines or coastal salt pans often grew rich from this trade.",
    "The new bus timetable starts next Monday. Buses on the main routes will run every ten minutes during the "
    "day and every twenty minutes in the evening. Printed timetables are available at the station and at the "
    "library.",
    "A healthy lawn needs less water than most people think. Watering deeply once a week encourages roots to "
    "grow down into the soil, while a light daily sprinkle keeps them near the surface. Letting the grass grow "
    "a little longer also helps.",
    "She opened the letter slowly, afraid of what it might say. The first line made her smile, and by the end "
    "she was laughing out loud. The job was hers, and she would start in September.",
    "Bacteria are everywhere, including inside our bodies. Most of them are harmless, and many are helpful, "
    "aiding digestion and protecting us from harmful microbes. Only a small fraction cause disease.",
    "The football match was tied until the final minute, when a young substitute scored from outside the box. "
    "The crowd exploded with noise, and his teammates piled on top of him. It was his first goal for the club.",
    "Writing clearly is mostly a matter of rewriting. The first draft gets the ideas down; later drafts remove "
    "unnecessary words, reorder paragraphs and replace vague phrases with precise ones. Reading the text aloud "
    "reveals many problems.",
    "In the desert, temperatures can fall below freezing at night even after a scorching day. Dry air holds "
    "little heat, so warmth escapes quickly once the sun sets. Travellers need both light clothing and warm "
    "blankets.",
    "The bakery has been run by the same family for three generations. The grandmother still arrives at four in "
    "the morning to start the bread, and her grandson handles the orders online. Regular customers say nothing "
    "has changed in forty years.",
    "Recycling works best when materials are sorted correctly. A single greasy pizza box can spoil a whole batch "
    "of paper, and plastic bags often jam sorting machines. Checking local rules takes a minute and helps a "
    "lot.",
    "The spacecraft spent seven months travelling to its destination. When it finally arrived, engineers on "
    "Earth waited anxiously for the first signal. The message confirmed that every system was working, and the "
    "control room erupted in cheers.",
    "A small garden pond can attract frogs, dragonflies and birds within a single season. It does not need to be "
    "large or deep, but it should have a shallow edge so animals can climb in and out safely.",
    "Memory is less like a recording and more like a reconstruction. Each time we recall an event, we rebuild "
    "it from pieces, and small details can change along the way. This is why honest witnesses sometimes "
    "disagree.",
    "The festival takes place every August in the old harbour. There is music on three stages, food from dozens "
    "of countries and a fireworks display on the final night. Thousands of visitors come from across the "
    "region.",
    "Before signing a contract, read it carefully and ask about anything you do not understand. Pay special "
    "attention to fees, deadlines and what happens if you want to cancel. It is much easier to change terms "
    "before you sign than after.",
    "Volcanic soil is often very fertile, which is why farmers return to the slopes of active volcanoes despite "
    "the risks. Vineyards, orchards and rice terraces can be found on mountains that erupted within living "
    "memory.",
    "The meeting room smelled of coffee and fresh paint. On the whiteboard, someone had drawn a rough plan of the "
    "new office, with arrows showing where each team would sit. Everyone had an opinion about the kitchen.",
    "Trees communicate in surprising ways. Their roots are linked by networks of fungi that carry water, sugar "
    "and chemical signals between them. Older trees can even support young seedlings growing in their shade.",
    "After years of planning, the town finally opened its new swimming pool. Schools booked lessons for every "
    "class, and the early morning sessions were full of swimmers before work. The old pool will become a "
    "community garden.",
    "To remove a stain from a cotton shirt, act quickly and use cold water first. Hot water can set some stains, "
    "especially blood and egg. A little washing-up liquid rubbed gently into the fabric often does the rest.",
    "The ancient library of Alexandria was said to hold hundreds of thousands of scrolls. Scholars came from "
    "across the Mediterranean to study there. Its gradual decline over several centuries remains a symbol of "
    "lost knowledge.",
    "The kitten had been hiding under the sofa since it arrived. By the third day, hunger won over fear, and it "
    "crept out to eat from the bowl by the door. A week later, it was sleeping on the warmest pillow in the "
    "house.",
    "Passwords are easier to remember and harder to guess when they are long phrases rather than short strings "
    "of symbols. Using a different password for every account stops one leak from exposing everything. A "
    "password manager makes this practical.",
    "The glaciers of the Alps have lost much of their ice over the past century. Old photographs show valleys "
    "filled with ice that are now bare rock. Scientists use these pictures to measure how quickly the climate "
    "is changing.",
    "Most successful small businesses start by solving one problem well for a small group of customers. "
    "Listening to those customers and improving step by step is usually more effective than trying to please "
    "everyone at once.",
    "The theatre was nearly empty for the first performance, but word spread quickly. By the end of the week, "
    "every seat was sold, and people were queuing outside for returned tickets. The run was extended twice.",
    "Honey never really spoils if it is kept sealed. Its low water content and natural acidity stop most "
    "microbes from growing. Jars found in ancient tombs were reported to be still edible thousands of years "
    "later.",
    "When the power went out, the family lit candles and played cards at the kitchen table. Without screens or "
    "music, the house felt strangely peaceful. When the lights came back on, nobody wanted to stop the game.",
    "Good posture at a desk reduces back and neck pain. The screen should be at eye level, the feet flat on the "
    "floor and the elbows close to the body. Standing up and moving around every half hour helps even more.",
    "Ships once relied on the stars to find their way across open water. Navigators measured the angle of the "
    "sun or a star above the horizon to work out their position. A small error could put a ship many miles off "
    "course.",
    "The new neighbours introduced themselves with a plate of homemade biscuits. They had moved from the other "
    "side of the country and knew nobody in town. Within a month, they had joined the choir and the Sunday "
    "football team.",
    "Statistics can mislead when the numbers are presented without context. A rise of one hundred percent "
    "sounds dramatic, but it may mean an increase from one case to two. Asking what the numbers are compared "
    "with is always a good start.",
    "Rain had fallen all week, and the children were restless. On Saturday the clouds finally broke, and they "
    "raced outside to jump in every puddle they could find. Their boots were full of water within minutes.",
    "Spiders are not insects; they have eight legs and two main body parts. Most are harmless to people and eat "
    "large numbers of flies and mosquitoes. Their silk is, weight for weight, stronger than steel.",
    "The council's plan to build new homes on the edge of town has drawn strong reactions. Supporters say "
    "young families badly need affordable housing, while opponents worry about traffic and the loss of green "
    "fields. A public meeting is planned for next month.",
    "A sourdough loaf takes time, but most of that time is waiting. Mixing the dough takes minutes, and the "
    "long slow rise develops flavour on its own. Many bakers start the dough in the evening and bake it the "
    "next morning.",
    "Glass is made by melting sand with soda and lime at very high temperatures. While it is hot, it can be "
    "blown, pressed or rolled into almost any shape. Glassmakers in Venice kept their techniques secret for "
    "centuries.",
    "He had practised the speech a dozen times, but his hands still shook as he walked to the microphone. After "
    "the first sentence, the nerves faded. By the end, people were smiling and nodding along.",
    "Walking is one of the most underrated forms of exercise. It needs no equipment, is gentle on the joints and "
    "can be fitted into almost any day. A brisk thirty-minute walk most days brings real health benefits.",
    "The radio telescope sits in a quiet valley far from towns and mobile phone masts. Even a small electronic "
    "device nearby can drown out the faint signals from space. Visitors are asked to switch off their phones at "
    "the gate.",
    "The first snow of winter fell overnight, covering the cars and rooftops in a thin white layer. By morning, "
    "children were building snowmen in the park, and the usual traffic noise had given way to an unusual "
    "silence.",
    "Vaccination programmes have saved millions of lives. Diseases that once filled hospitals every winter are "
    "now rare in many countries. Keeping vaccination rates high protects people who cannot be vaccinated "
    "themselves.",
    "The shop sold nothing but maps, old and new. Some were framed on the walls, others lay in wide wooden "
    "drawers that customers could browse for hours. The owner could tell you the history of every one.",
    "Clear instructions tell the reader what to do, in what order and why. Numbered steps, short sentences and "
    "one action per step make them easy to follow. A quick test with someone who has never done the task "
    "reveals any gaps.",
    "Bees and many other insects see ultraviolet light that is invisible to us. Many flowers have patterns in "
    "ultraviolet that guide insects towards the nectar. To a bee, a plain yellow flower may look like a target.",
    "The old factory by the canal has been turned into studios for artists and small workshops. On the first "
    "weekend of each month, the doors open to the public, and visitors can watch potters, printers and "
    "woodworkers at work.",
    "A balanced diet does not need to be complicated. Plenty of vegetables and fruit, whole grains, some protein "
    "and not too much sugar or salt cover most needs. Cooking at home makes it easier to know what you are "
    "eating.",
    "The climbers set off before dawn to reach the summit before the afternoon clouds. The last section was "
    "steep and icy, and they moved slowly, roped together. At the top, they had only a few minutes to enjoy the "
    "view.",
    "Copyright protects the way an idea is expressed, not the idea itself. Anyone may write a story about a "
    "detective solving a crime, but copying the text of someone else's novel is not allowed without "
    "permission.",
    "The evening was warm, and the whole street seemed to be outside. Neighbours talked over garden fences, "
    "children rode bicycles up and down the pavement, and the smell of grilled food drifted from several "
    "back gardens.",
    "Electric cars are quiet, cheap to run and produce no exhaust on the road. Their main drawbacks are the "
    "price, the time needed to charge and the limited number of chargers in some regions. All three are "
    "improving year by year.",
    "Patience is an underrated skill in almost every field. Gardens, friendships, businesses and good software "
    "all grow slowly. Those who keep going through the slow early stages are often the ones who succeed.",
]
